"""lensflow work units: importable and testable without Prefect or Ray."""
