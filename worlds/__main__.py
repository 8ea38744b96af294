"""A world's own commands: `python -m worlds pretrained students`, `python -m worlds freeform rules`, `python -m worlds freeform examples`,
`python -m worlds toy tiny --out DIR`."""
import sys

from worlds import freeform, pretrained, toy

COMMANDS = {"freeform": freeform.main, "pretrained": pretrained.main, "toy": toy.main}

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    sys.exit(f"usage: python -m worlds {{{','.join(COMMANDS)}}} ...")
COMMANDS[sys.argv[1]](sys.argv[2:])
