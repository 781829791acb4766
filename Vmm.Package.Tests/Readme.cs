// Readme: the repository's README.md and its C# samples, as the tests see them.
//
// A sample is a ```csharp fenced block. A block that is a fragment (it uses variables such as
// `payload` or `process` that the text around it only describes) is preceded by an HTML comment, which
// a reader of the rendered README does not see:
//
//   <!-- sample-prelude (any words on this first line):
//   using Vmm;
//   byte[] payload = new byte[4096];
//   -->
//   ```csharp
//
// The lines after the comment's first line are the prelude. A sample compiles as a console program of
// top-level statements: the using directives of the prelude and of the block first, then the prelude's
// statements, then the block's; with the global usings a `dotnet new console` project has
// (ImplicitUsings), since that is where a user pastes a sample.
using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace Vmm.Package.Tests;

/// <summary>One csharp block of the README.</summary>
/// <param name="Heading">the nearest heading above it ("Using it from a host application").</param>
/// <param name="Line">its first line in README.md (1-based), for messages.</param>
/// <param name="Code">the block as written.</param>
/// <param name="Prelude">the sample-prelude above it, or "".</param>
/// <param name="PreludeLine">the prelude's first line in README.md.</param>
public sealed partial record ReadmeSample(string Heading, int Line, string Code, string Prelude, int PreludeLine)
{
    /// <summary>The usings an SDK console project imports implicitly (ImplicitUsings=enable).</summary>
    public static readonly string[] ImplicitUsings =
        ["System", "System.Collections.Generic", "System.IO", "System.Linq", "System.Net.Http", "System.Threading", "System.Threading.Tasks"];

    /// <summary>
    /// The program the test compiles: the using directives, then the prelude, then the block. #line
    /// directives (and a blank line where a using was) make the compiler's messages point at README.md.
    /// </summary>
    public string Program()
    {
        var usings = new StringBuilder();
        var body = new StringBuilder();
        foreach ((string part, int line) in new[] { (Prelude, PreludeLine), (Code, Line) })
        {
            if (part.Length == 0)
                continue;
            body.AppendLine(CultureInfo.InvariantCulture, $"#line {line} \"README.md\"");
            foreach (string text in part.TrimEnd('\n').Split('\n'))
            {
                bool directive = UsingDirective().IsMatch(text);
                (directive ? usings : body).AppendLine(text);
                if (directive)
                    body.AppendLine();
            }
        }
        return $"{usings}{body}";
    }

    /// <summary>A name for test cases: the heading and the line.</summary>
    public override string ToString() => $"{Heading} (README.md line {Line})";

    // A using directive ("using Vmm;", "using static X;", "using A = B;"), not a using declaration
    // ("using var x = ...;").
    [GeneratedRegex(@"^\s*(global\s+)?using\s+(static\s+)?([\w.]+\s*=\s*)?[\w.]+\s*;\s*(//.*)?$")]
    private static partial Regex UsingDirective();
}

/// <summary>Finds the repository and reads README.md.</summary>
public static partial class Readme
{
    /// <summary>The repository root: the nearest folder above the test binaries that holds Vmm.sln.</summary>
    public static string RepositoryRoot { get; } = FindRoot();

    /// <summary>README.md's full path.</summary>
    public static string Path => System.IO.Path.Combine(RepositoryRoot, "README.md");

    /// <summary>Every csharp block of README.md, in order.</summary>
    public static IReadOnlyList<ReadmeSample> Samples() => Parse(File.ReadAllLines(Path));

    /// <summary>The first csharp block under the heading <paramref name="heading"/>.</summary>
    public static ReadmeSample Sample(string heading) =>
        Samples().FirstOrDefault(s => s.Heading == heading)
        ?? throw new InvalidOperationException($"README.md has no csharp block under \"{heading}\"");

    /// <summary>Splits markdown lines into samples.</summary>
    public static IReadOnlyList<ReadmeSample> Parse(string[] lines)
    {
        var samples = new List<ReadmeSample>();
        string heading = "";
        string? prelude = null;      // the last sample-prelude comment, until a block or other text
        int preludeLine = 0;
        for (int i = 0; i < lines.Length; i++)
        {
            string line = lines[i];
            if (line.StartsWith('#'))
            {
                heading = line.TrimStart('#').Trim();
                prelude = null;
            }
            else if (line.TrimStart().StartsWith("<!-- sample-prelude", StringComparison.Ordinal))
            {
                var text = new StringBuilder();
                preludeLine = i + 2;
                while (++i < lines.Length && !lines[i].TrimStart().StartsWith("-->", StringComparison.Ordinal))
                    text.AppendLine(lines[i]);
                prelude = text.ToString();
            }
            else if (line.TrimEnd() == "```csharp")
            {
                int start = i + 1;
                var code = new StringBuilder();
                while (++i < lines.Length && lines[i].TrimEnd() != "```")
                    code.AppendLine(lines[i]);
                samples.Add(new ReadmeSample(heading, start + 1, code.ToString(), prelude ?? "", preludeLine));
                prelude = null;
            }
            else if (line.StartsWith("```", StringComparison.Ordinal))
            {
                while (++i < lines.Length && lines[i].TrimEnd() != "```")
                {
                }
                prelude = null;
            }
            else if (line.Trim().Length > 0)
            {
                prelude = null; // a prelude belongs to the block right after it
            }
        }
        return samples;
    }

    private static string FindRoot()
    {
        for (string? dir = AppContext.BaseDirectory; dir is not null; dir = System.IO.Path.GetDirectoryName(dir))
        {
            if (File.Exists(System.IO.Path.Combine(dir, "Vmm.sln")))
                return dir;
        }
        throw new InvalidOperationException($"no Vmm.sln above {AppContext.BaseDirectory}");
    }
}
