from faithlens.cli import main

raise SystemExit(main())
