import sys

from ssl_vil.train.cli import main

sys.exit(main())
