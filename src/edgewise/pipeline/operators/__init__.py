"""Operators (pipeline stages). Each module holds one operator and its Config."""
