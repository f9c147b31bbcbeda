from invite_mailer.cli import main

raise SystemExit(main())
