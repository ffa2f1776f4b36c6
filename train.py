"""``deepspeed train.py --config configs/<run>.yaml [key.sub=value ...]``: see promoter_dist/train.py."""

import sys

from promoter_dist.train import main

if __name__ == "__main__":
    sys.exit(main())
