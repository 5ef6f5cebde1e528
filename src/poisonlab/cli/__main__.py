"""`python -m poisonlab.cli ...` runs the `poisonlab` command (and `torchrun ... -m poisonlab.cli train`)."""

from poisonlab.cli import main

if __name__ == "__main__":
    main()
