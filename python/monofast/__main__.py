from monofast.cli import main

raise SystemExit(main())
