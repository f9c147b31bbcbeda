"""Pure answers from inputs, a ledger view and now.

The plan, German wording, calendar files and signed tokens.
"""
