using System.Reflection;
using System.Runtime.Loader;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;

namespace Vmm.Package.Tests;

/// <summary>
/// Every ```csharp block of README.md compiles as written, against the Vmm.Core and Vmm.Native this
/// build produced (in-process Roslyn, C# 14 as the .NET 10 SDK), with its sample-prelude if it is a
/// fragment (see <see cref="Readme"/>); and then runs to the end without an exception. The README is
/// read as it is on disk: a sample that drifts from the public API fails here, naming its line.
/// </summary>
[TestFixture]
public sealed class ReadmeSampleTests
{
    private static readonly TimeSpan RunDeadline = TimeSpan.FromSeconds(60);
    private static readonly Lazy<List<MetadataReference>> References = new(LoadReferences);

    private static IEnumerable<TestCaseData> Samples() =>
        Readme.Samples().Select(s => new TestCaseData(s).SetArgDisplayNames(s.ToString()));

    [Test]
    public void The_readme_has_csharp_samples_to_check()
    {
        IReadOnlyList<ReadmeSample> samples = Readme.Samples();

        Assert.That(samples, Has.Count.GreaterThanOrEqualTo(3), "the host application, deduplicated buffers and KSM samples");
        Assert.That(samples.Select(s => s.Heading), Does.Contain("Using it from a host application"));
    }

    [TestCaseSource(nameof(Samples))]
    public void A_readme_sample_compiles_as_written_and_runs(ReadmeSample sample)
    {
        byte[] assembly = Compile(sample);

        Exception? failure = Run(assembly, out bool finished);

        Assert.That(finished, Is.True, $"{sample} did not finish within {RunDeadline.TotalSeconds} s");
        Assert.That(failure, Is.Null, $"{sample} threw:\n{failure}");
    }

    [Test]
    public void A_sample_that_uses_a_missing_member_fails_with_its_readme_line()
    {
        var broken = new ReadmeSample("broken", 40, "using Vmm;\nusing var machine = new Machine();\nmachine.NoSuchMember();\n", "", 0);

        var error = Assert.Throws<AssertionException>(() => Compile(broken));

        Assert.That(error!.Message, Does.Contain("README.md(42,").And.Contain("NoSuchMember"), "the diagnostic points at the README line");
    }

    /// <summary>The sample as a console program, or an assertion failure listing the compiler's errors.</summary>
    private static byte[] Compile(ReadmeSample sample)
    {
        var parse = new CSharpParseOptions(LanguageVersion.CSharp14);
        string globalUsings = string.Concat(ReadmeSample.ImplicitUsings.Select(u => $"global using global::{u};\n"));
        CSharpCompilation compilation = CSharpCompilation.Create(
            "ReadmeSample", // not a name Vmm's InternalsVisibleTo lets in: the sample sees the public API only
            [CSharpSyntaxTree.ParseText(globalUsings, parse, "GlobalUsings.cs"), CSharpSyntaxTree.ParseText(sample.Program(), parse, "Program.cs")],
            References.Value,
            new CSharpCompilationOptions(OutputKind.ConsoleApplication, nullableContextOptions: NullableContextOptions.Enable));
        using var image = new MemoryStream();
        Microsoft.CodeAnalysis.Emit.EmitResult result = compilation.Emit(image);
        string[] errors = [.. result.Diagnostics.Where(d => d.Severity == DiagnosticSeverity.Error).Select(d => d.ToString())];
        if (errors.Length > 0)
            Assert.Fail($"{sample} does not compile:\n{string.Join("\n", errors)}\n\nThe program compiled:\n{sample.Program()}");
        return image.ToArray();
    }

    /// <summary>The runtime's reference set (what a console app compiles against) plus Vmm.Core and Vmm.Native.</summary>
    private static List<MetadataReference> LoadReferences()
    {
        string runtime = Path.GetDirectoryName(typeof(object).Assembly.Location)!;
        var references = Directory.GetFiles(runtime, "*.dll")
            .Where(IsManagedAssembly)
            .Select(path => (MetadataReference)MetadataReference.CreateFromFile(path))
            .ToList();
        Assembly core = typeof(Machine).Assembly;
        Assembly native = Assembly.Load(core.GetReferencedAssemblies().Single(a => a.Name == "Vmm.Native"));
        references.Add(MetadataReference.CreateFromFile(core.Location));
        references.Add(MetadataReference.CreateFromFile(native.Location));
        return references;
    }

    private static bool IsManagedAssembly(string path)
    {
        try
        {
            AssemblyName.GetAssemblyName(path);
            return true;
        }
        catch (BadImageFormatException)
        {
            return false; // the runtime folder also holds native libraries
        }
    }

    /// <summary>Runs the program's entry point on a thread with a deadline; the exception it threw, if any.</summary>
    private static Exception? Run(byte[] image, out bool finished)
    {
        // A collectible context of its own; Vmm.Core and Vmm.Native resolve to the ones already loaded.
        var context = new AssemblyLoadContext("readme-sample", isCollectible: true);
        try
        {
            MethodInfo entry = context.LoadFromStream(new MemoryStream(image)).EntryPoint!;
            Exception? failure = null;
            var thread = new Thread(() =>
            {
                try
                {
                    entry.Invoke(null, entry.GetParameters().Length == 0 ? null : [Array.Empty<string>()]);
                }
                catch (TargetInvocationException e)
                {
                    failure = e.InnerException;
                }
            }) { IsBackground = true };
            thread.Start();
            finished = thread.Join(RunDeadline);
            return failure;
        }
        finally
        {
            context.Unload();
        }
    }
}
