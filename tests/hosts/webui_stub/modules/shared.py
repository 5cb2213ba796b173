"""Stand-in for modules/shared.py: opts, OptionInfo and the parsed command line."""

from argparse import Namespace

from . import options

OptionInfo = options.OptionInfo
opts = options.Options()
cmd_opts = Namespace(das_store=None, das_device=None, lora_dir=None)
