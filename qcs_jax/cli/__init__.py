"""The command-line programs (the console scripts qcs-*), above the library they use."""
