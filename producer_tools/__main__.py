from producer_tools.cli import main

raise SystemExit(main())
