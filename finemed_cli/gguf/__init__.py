"""Reading and naming GGUF, below every stage: the header values (header.py), the tokenizer (tokenizer.py), token
types and pre-tokenizer names (tokens.py), finemed's outtypes and keys (constants.py). One file per format
concern, as gguf-py; models, generate, serve, ttt and export all import it, it imports none of them."""
