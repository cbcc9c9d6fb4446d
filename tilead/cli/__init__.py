"""Command-line entry points: thin click commands that parse, call the library and print."""
