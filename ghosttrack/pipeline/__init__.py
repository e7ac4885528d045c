"""Runs: stages, the papermill runner, reports and the bench. Imports every library layer; never the command line."""
