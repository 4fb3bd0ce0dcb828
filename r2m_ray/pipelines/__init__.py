"""r2m_ray.pipelines."""
