"""`ahead lsp`: the language server that shows the engine's completions in editors (pygls 2, the `lsp` extra).

server.py holds the handlers; settings.py, backends.py (+ spawn.py), suggestion.py, typing_cache.py and
documents.py are the pieces they call; context.py (repository context) and remote.py (an
OpenAI-compatible backend) are optional. Nothing in engine/ imports this package.
"""
