using System.Globalization;
using System.Text.Json;

namespace Vmm.Bench.Scenarios;

/// <summary>A macro scenario: runs once, prints progress, returns its results for the JSON line.</summary>
internal interface IScenario
{
    /// <summary>The name typed after <c>scenario</c>.</summary>
    string Name { get; }

    /// <summary>One line of help.</summary>
    string Description { get; }

    /// <summary>Runs the scenario and returns the keys of its JSON result line, in order.</summary>
    IReadOnlyList<KeyValuePair<string, object>> Run(ScenarioArgs args);
}

/// <summary>The <c>--name value</c> options after the scenario's name.</summary>
internal sealed class ScenarioArgs
{
    private readonly Dictionary<string, string?> _values = new(StringComparer.Ordinal);

    public ScenarioArgs(IReadOnlyList<string> args)
    {
        for (int i = 0; i < args.Count; i++)
        {
            string a = args[i];
            if (!a.StartsWith("--", StringComparison.Ordinal))
                throw new ArgumentException($"unexpected argument '{a}'");
            string key = a[2..];
            string? value = i + 1 < args.Count && !args[i + 1].StartsWith("--", StringComparison.Ordinal) ? args[++i] : null;
            _values[key] = value;
        }
    }

    public bool Has(string name) => _values.ContainsKey(name);

    public string GetString(string name, string defaultValue) =>
        _values.TryGetValue(name, out string? v) && v is not null ? v : defaultValue;

    public int GetInt(string name, int defaultValue) =>
        _values.TryGetValue(name, out string? v) && v is not null ? int.Parse(v, CultureInfo.InvariantCulture) : defaultValue;
}

internal static class ScenarioRunner
{
    private static readonly IScenario[] Scenarios =
    [
        new PageOpsScenario(),
        new AllocScenario(),
        new FaultScenario(),
        new CowScenario(),
        new AccessScenario(),
        new ForkScenario(),
        new FlushScenario(),
        new KsmScenario(),
        new KsmUnmergeScenario(),
        new KsmIndexScenario(),
        new MigrateScenario(),
        new MigrateKsmScenario(),
        new MigrateWriterScenario(),
        new OfflineScenario(ksmHalf: false),
        new OfflineScenario(ksmHalf: true),
        new OfflineWriterScenario(),
        new ContigScenario(),
        new CompactScenario(),
    ];

    public static int Run(string[] args)
    {
        if (args.Length == 0 || Array.Find(Scenarios, s => s.Name == args[0]) is not { } scenario)
        {
            Console.Error.WriteLine("usage: scenario NAME [--option value ...]");
            foreach (IScenario s in Scenarios)
                Console.Error.WriteLine($"  {s.Name,-16} {s.Description}");
            return 2;
        }

        IReadOnlyList<KeyValuePair<string, object>> result = scenario.Run(new ScenarioArgs(args[1..]));
        Console.WriteLine(ToJson(result));
        return 0;
    }

    /// <summary>One JSON object, keys in the scenario's order, numbers with invariant culture.</summary>
    public static string ToJson(IReadOnlyList<KeyValuePair<string, object>> values)
    {
        using var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            writer.WriteStartObject();
            foreach ((string key, object value) in values)
            {
                switch (value)
                {
                    case string s: writer.WriteString(key, s); break;
                    case bool b: writer.WriteBoolean(key, b); break;
                    case int i: writer.WriteNumber(key, i); break;
                    case long l: writer.WriteNumber(key, l); break;
                    case double d: writer.WriteNumber(key, Math.Round(d, 3)); break;
                    default: writer.WriteString(key, Convert.ToString(value, CultureInfo.InvariantCulture)); break;
                }
            }
            writer.WriteEndObject();
        }
        return System.Text.Encoding.UTF8.GetString(stream.ToArray());
    }
}
