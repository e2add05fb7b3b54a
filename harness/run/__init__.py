"""Running the matrix: the runner in the parent, one isolated worker per combination, and their records' reasons."""
