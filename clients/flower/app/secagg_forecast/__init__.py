"""Example Flower App: pedestrian-count forecasters averaged by secagg inside Flower."""
