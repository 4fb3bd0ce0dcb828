"""r2m_ray.algos."""
