"""``python -m pdeds`` runs the ``pdeds`` command."""

from __future__ import annotations

from pdeds.cli import main

raise SystemExit(main())
