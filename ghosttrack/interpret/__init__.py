"""Reading features: top-activating examples, common tokens, dashboards, and a run's interpretation. Imports the layers below."""
