import sys

try:
    from edgecm_cli import main
except KeyboardInterrupt:  # Ctrl-C while Python is still importing: the same one line as later on
    print("\nedgecm: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
