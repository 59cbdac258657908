"""The measurement commands: `ahead bench` (methods compared on speed and quality), `ahead bench
keystrokes` (typing replayed) and `ahead tune` (the lookahead config search).

commands.py defines their flags without importing torch; harness.py holds what they share;
each command's module is imported only when it runs.
"""
