"""The vocabulary the driver (``orchestrator/``) and the replicas (``actors/``) share: configuration, messages,
errors, logging set-up and prompts. Both import it; it imports neither, nor Ray or torch
(``tests/test_layering.py``), so no import runs from a replica back up into the driver."""
