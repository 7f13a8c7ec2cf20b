from bin_controller.cli import main

raise SystemExit(main())
