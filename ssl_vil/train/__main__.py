import sys

from ssl_vil.train import main

sys.exit(main())
