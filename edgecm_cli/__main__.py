import sys

from edgecm_cli import main

sys.exit(main())
