"""zimage-orchestrator: serve Z-Image-Turbo on a Ray cluster.

The package root stays import-light (no torch, no ray) so that config validation, planning and the CLI's
help start instantly; the heavy modules are imported where they are used.
"""

__version__ = "0.1.0"
