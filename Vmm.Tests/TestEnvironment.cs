using System.Globalization;

namespace Vmm.Tests;

/// <summary>Knobs that make the bounded stress and model tests run longer: VMM_STRESS_SCALE=N multiplies iterations.</summary>
internal static class TestEnvironment
{
    /// <summary>Iteration multiplier from VMM_STRESS_SCALE (default 1).</summary>
    public static int StressScale { get; } =
        int.TryParse(Environment.GetEnvironmentVariable("VMM_STRESS_SCALE"), NumberStyles.Integer, CultureInfo.InvariantCulture, out int scale) && scale > 0 ? scale : 1;

    /// <summary>
    /// VMM_STRESS_SECONDS: when set, the concurrency stress tests run for this long instead of a
    /// bounded number of iterations (for soak runs, e.g. 3600).
    /// </summary>
    public static TimeSpan? StressDuration { get; } =
        int.TryParse(Environment.GetEnvironmentVariable("VMM_STRESS_SECONDS"), NumberStyles.Integer, CultureInfo.InvariantCulture, out int seconds) && seconds > 0
            ? TimeSpan.FromSeconds(seconds) : null;

    /// <summary>Seed for the seeded tests from VMM_SEED (default: the test's own).</summary>
    public static int Seed(int defaultSeed) =>
        int.TryParse(Environment.GetEnvironmentVariable("VMM_SEED"), NumberStyles.Integer, CultureInfo.InvariantCulture, out int seed) ? seed : defaultSeed;
}
