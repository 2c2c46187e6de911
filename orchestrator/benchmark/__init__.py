"""``zimage-orch bench``: the benchmark tooling, apart from the server.

``loadgen`` (request streams, closed and open loops, API and HTTP senders), ``report`` (statistics, ratios, the
JSON, plot and table), ``run`` (the ``bench`` command and the plain-diffusers baseline), ``sizes`` (random sizes
and each request's arithmetic), ``matrix`` (the project's GPU runs, ``--matrix``). Its plot needs matplotlib, the
``bench`` extra (``pip install 'zimage-orchestrator[bench]'``); the server imports nothing from here.
"""
