"""Cached facts about a model that passes read: activation statistics, moments, chains, costs, sensitivity."""
