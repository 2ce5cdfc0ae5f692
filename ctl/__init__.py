"""``clearipctl``: manage the running proxy (trust list, emergency numbers, status)."""
