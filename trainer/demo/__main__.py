"""`python -m trainer.demo`: see trainer.demo.pipeline."""

from trainer.demo.pipeline import main

if __name__ == "__main__":
    main()
