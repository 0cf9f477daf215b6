from gramvl.cli import main

raise SystemExit(main())
