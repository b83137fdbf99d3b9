"""`finemed serve`: an OpenAI-compatible HTTP server with optional per-request TTT."""
