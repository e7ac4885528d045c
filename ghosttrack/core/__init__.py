"""Foundation: configs and their validation, presets, atomic files and checksums, the run folder's layout. Imports nothing else of ghosttrack."""
