"""The icd pipeline runtime."""
