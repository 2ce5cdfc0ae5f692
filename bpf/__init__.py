"""The XDP edge filter (C source shipped as package data) and its bcc loader."""
