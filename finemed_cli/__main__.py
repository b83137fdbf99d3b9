"""`python -m finemed_cli …` is the same as `finemed …` (used by `accelerate launch -m finemed_cli`)."""

from finemed_cli.cli.main import main

if __name__ == "__main__":
    main()
