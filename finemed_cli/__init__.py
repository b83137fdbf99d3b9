"""finemed: offline medical-reasoning LLMs with retrieval and test-time training."""

from __future__ import annotations

__version__ = "0.1.0"
