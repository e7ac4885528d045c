"""Attribution graphs: the local replacement model, pruning, export (circuit-tracer JSON, CSV, PNG, HTML). Imports interpret and the layers below."""
