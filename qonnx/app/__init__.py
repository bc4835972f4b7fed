"""The application: the Python API, the command line, bench, attribution and the mixed-precision sweep."""
