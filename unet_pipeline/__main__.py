"""`python -m unet_pipeline <stage>`: the CLI, run by this interpreter (how the workflow's rules call it)."""
import sys

from unet_pipeline.cli import main

sys.exit(main())
