"""`python -m adaswitch.demo` = `adaswitch demo`."""

from adaswitch.demo.run import main

raise SystemExit(main())
