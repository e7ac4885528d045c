"""`python -m ghosttrack …` is the `ghosttrack` command; it is also how torchrun starts it:
`torchrun --nproc_per_node 2 -m ghosttrack train --run-dir R` (data-parallel SAE training, see nbs/25_dict_trainer.ipynb).
Written by hand (nbdev exports no __main__ module); the command itself is `ghosttrack.cli.main` (nbs/90_cli_main.ipynb)."""
import sys

from ghosttrack.cli.main import main

sys.exit(main())
