"""Load generation and the correctness checker that judges every move."""
