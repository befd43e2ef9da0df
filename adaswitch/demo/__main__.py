"""`python -m adaswitch.demo` = `adaswitch demo`."""

from adaswitch.demo.run import main

if __name__ == "__main__":  # the demo's spawned worker processes import this module without running it
    raise SystemExit(main())
