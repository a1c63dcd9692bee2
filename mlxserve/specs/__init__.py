"""ModelSpec, Options, the Modelfile parser and chat templates."""
