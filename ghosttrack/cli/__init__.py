"""The ghosttrack command: argument parsing and printing only. Nothing imports it."""
