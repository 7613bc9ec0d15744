"""DataError: the one exception for bad input data (files, lines, keys, values)."""


class DataError(ValueError):
  """Bad input: names the file, line, key or value that is wrong."""
