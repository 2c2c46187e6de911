"""The text encoder's penultimate forward and its CUDA-graph buckets, on the CPU: the graphs' bookkeeping (buckets,
chunks, padding, trimming) runs with each graph's replay standing in as the eager forward it captured
(tests/test_gpu.py captures real graphs)."""

import pytest
import torch

from actors.encoder_graphs import COUNTS, LENGTHS, EncoderGraphs, chunks, penultimate
from actors.engine import ZImageEngine
from actors.models import build_components


@pytest.fixture(scope="module")
def engine():
    comps = build_components("tiny")
    return ZImageEngine(comps, dict.fromkeys(("transformer", "text_encoder", "vae"), "cpu"), torch.float32)


class _Eager:
    """Stands in for one captured graph: its replay runs the forward it would have captured."""

    def __init__(self, graphs: EncoderGraphs, b: int, n: int):
        self.graphs, self.b, self.n, self.replays = graphs, b, n, 0

    def replay(self) -> None:
        self.replays += 1
        self.graphs._forward(self.b, self.n)


def cpu_graphs(engine, **kw) -> EncoderGraphs:
    graphs = EncoderGraphs(engine.encoder, torch.device("cpu"), **kw)
    graphs.graphs = {(b, n): _Eager(graphs, b, n) for b in graphs.counts for n in graphs.lengths}
    return graphs


def test_penultimate_is_the_state_zimage_takes_without_running_the_last_layer():
    te = build_components("tiny")["text_encoder"]
    pen = penultimate(te)
    assert len(pen.layers) == len(te.layers) - 1 and isinstance(pen.norm, torch.nn.Identity)
    assert isinstance(te.norm, torch.nn.Module) and not isinstance(te.norm, torch.nn.Identity)  # te is unchanged
    assert pen.layers[0] is te.layers[0] and pen.embed_tokens is te.embed_tokens  # shared: later swaps apply
    ids = torch.randint(0, te.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(20)[None] < torch.tensor([20, 13, 4])[:, None]
    with torch.no_grad():
        want = te(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        got = pen(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    for i, n in enumerate((20, 13, 4)):
        torch.testing.assert_close(got[i, :n], want[i, :n], rtol=0, atol=0)


def test_chunks_cover_any_count_with_graphed_counts_and_no_padded_rows():
    assert chunks(1) == [1] and chunks(8) == [8] and chunks(7) == [4, 2, 1] and chunks(19) == [8, 8, 2, 1]
    for n in range(1, 40):
        assert sum(chunks(n)) == n and all(c in COUNTS for c in chunks(n))
    assert LENGTHS[-1] == 512  # the longest caption the engine keeps (max_sequence_length)


def test_graphs_give_what_the_eager_encoder_gives_at_every_count_and_length(engine):
    prompts = ["a red fox", "a lighthouse on a rocky coast at sunset, " * 3, "x", "a quiet harbor " * 9, "b c d"]
    with torch.no_grad():
        want = engine.encode(prompts * 3).positive  # eager: padded to the longest, masked
        graphs = cpu_graphs(engine, lengths=(16, 48, 96, 160))
        engine.encoder_graphs = graphs
        try:
            for k in (1, 2, 3, 5, 7, 11, 15):  # one chunk, several chunks, chunks of different counts
                got = engine.encode((prompts * 3)[:k]).positive
                assert [g.shape for g in got] == [w.shape for w in want[:k]]
                for g, w in zip(got, want[:k]):
                    torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        finally:
            engine.encoder_graphs = None
    used = {key for key, g in graphs.graphs.items() if g.replays}
    assert {b for b, _ in used} == {1, 2, 4, 8} and all(n in (16, 48, 96, 160) for _, n in used)


def test_graph_output_is_the_callers_own_and_padding_is_rewritten(engine):
    graphs = cpu_graphs(engine, lengths=(8, 32), counts=(1, 2))
    long = torch.randint(1, 100, (2, 30))  # never the pad id
    short = long[:1, :5]
    with torch.no_grad():
        a = graphs.run(short)
        first = a.clone()
        graphs.run(long)  # the buffers are overwritten by the next call ...
        torch.testing.assert_close(a, first, rtol=0, atol=0)  # ... but not the tensor a call returned
        assert a.shape == (1, 5, engine.encoder.config.hidden_size)
        assert not graphs.ids[0, 5:8].eq(graphs.pad_id).all()  # the long call's ids are still there ...
        torch.testing.assert_close(graphs.run(short), first, rtol=0, atol=0)
        assert graphs.ids[0, 5:8].eq(graphs.pad_id).all()  # ... until a short call pads over them
        assert graphs.run(torch.zeros(1, 33, dtype=torch.long)) is None  # longer than every graph: eager
    assert EncoderGraphs(engine.encoder, torch.device("cpu")).run(short) is None  # nothing captured: eager


def test_the_captured_forward_is_causal_attention_without_a_mask(engine, monkeypatch):
    """While a stream captures, transformers treats the call as traced and builds an explicit mask from an attention
    mask it is given (here an all-ones one); the graphs' forward asks for none at all, so the capture runs the kernel
    the warm-up ran: causal attention, no mask."""
    import torch.nn.functional as F

    graphs = EncoderGraphs(engine.encoder, torch.device("cpu"), lengths=(16,), counts=(2,))
    graphs.ids[:, :16] = torch.randint(1, 100, (2, 16))
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with torch.no_grad():
        graphs._forward(2, 16)
        ones = torch.ones(2, 16, dtype=torch.bool)
        want = engine.encoder(input_ids=graphs.ids[:2, :16], attention_mask=ones).last_hidden_state
    layers = len(engine.encoder.layers)
    assert seen[:layers] == [(True, True)] * layers
    assert seen[layers:] and all(not unmasked for unmasked, _ in seen[layers:])  # an explicit mask: capture faked
    torch.testing.assert_close(graphs.out[:2, :16], want, rtol=1e-5, atol=1e-6)
